-- one PostgreSQL for both servers, one database each
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
